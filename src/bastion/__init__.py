"""Bastion: a self-hosted, security-first Matrix homeserver."""

__version__ = "0.1.0"
