"""Multi-exit networks: definition, training and export (torch), plus the torch-free bundle format.

Importing this package does not import torch; `exitserve.models.bundle` is what the server uses.
"""
