"""Inference: llama.cpp in a child process per model, spoken to over msgpack frames."""

from .client import InferenceError, InferenceWorker, Overloaded, WorkerConfig, WorkerCrashed
from .pool import ModelPool, default_threads

__all__ = ["InferenceError", "InferenceWorker", "ModelPool", "Overloaded", "WorkerConfig", "WorkerCrashed",
           "default_threads"]
