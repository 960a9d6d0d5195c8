"""Inference: llama.cpp in a child process per model, spoken to over msgpack frames; one entry that admits, runs
and counts requests (`Inference.generate`, `Inference.embed`)."""

from .admission import Admission
from .client import InferenceError, InferenceWorker, Overloaded, WorkerConfig, WorkerCrashed
from .pool import ModelPool, default_threads
from .serving import Done, Embeddings, Generation, Inference, Token

__all__ = ["Admission", "Done", "Embeddings", "Generation", "Inference", "InferenceError", "InferenceWorker",
           "ModelPool", "Overloaded", "Token", "WorkerConfig", "WorkerCrashed", "default_threads"]
