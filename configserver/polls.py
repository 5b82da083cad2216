"""The record of one poll, under the name the inventory has always used for it."""

from .outcome import Outcome as PollRecord

__all__ = ["PollRecord"]
