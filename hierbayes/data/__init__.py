"""Data sets shipped with hierbayes (posteriordb radon and eight schools, Omniglot)."""
