"""banklm: small, precise models for credit, audit and AML work at small banks."""

__version__ = "0.1.0"
