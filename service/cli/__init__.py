"""The `exitserve` command line (`exitserve.service.cli.main:main`)."""

from exitserve.service.cli.main import main

__all__ = ["main"]
