"""Enriched registry events: the model, and the recorder the API hands them to."""

from .model import Action, Actor, Event, RequestInfo, Source, Target
from .recorder import EventRecorder, NullRecorder

__all__ = [
    "Action",
    "Actor",
    "Event",
    "EventRecorder",
    "NullRecorder",
    "RequestInfo",
    "Source",
    "Target",
]
