"""Voice: speech to text (faster-whisper) and text to speech (piper), from speech models held in the store like any
other model, run off the event loop under the same admission as chat. `routes.py` serves OpenAI's audio endpoints."""

from .engines import Segment, Transcript, Word
from .service import OPENAI_VOICES, STT_ALIASES, TTS_ALIASES, VoiceError, VoiceService

__all__ = ["OPENAI_VOICES", "STT_ALIASES", "TTS_ALIASES", "Segment", "Transcript", "VoiceError", "VoiceService",
           "Word"]
