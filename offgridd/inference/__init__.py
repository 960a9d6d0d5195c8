"""Inference: llama.cpp in a child process per model, spoken to over msgpack frames."""

from .client import InferenceError, InferenceWorker, WorkerConfig, WorkerCrashed
from .pool import ModelPool, default_threads

__all__ = ["InferenceError", "InferenceWorker", "ModelPool", "WorkerConfig", "WorkerCrashed", "default_threads"]
