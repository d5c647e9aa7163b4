"""eSpeak NG through ctypes: synchronous synthesis with per-phoneme timing events.

The `espeakng-loader` wheel ships libespeak-ng and its data folder, so nothing is installed system-wide.
eSpeak keeps global state, so one process holds one engine (`engine()`), guarded by a lock; generation
parallelism comes from processes, each with its own engine.

Synchronous mode (AUDIO_OUTPUT_SYNCHRONOUS) makes espeak_Synth return only when the whole text is
synthesised; the synth callback receives the audio in chunks with the events that fall in each chunk.
espeakINITIALIZE_PHONEME_EVENTS adds an event per phoneme (its mnemonic, with eSpeak's stress marks:
"'" primary, "," secondary) whose `sample` field is its start in output samples.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x0001
INITIALIZE_DONT_EXIT = 0x8000
POS_CHARACTER = 1
CHARS_UTF8 = 1
EVENT_LIST_TERMINATED = 0
EVENT_WORD = 1
EVENT_SENTENCE = 2
EVENT_END = 5
EVENT_MSG_TERMINATED = 6
EVENT_PHONEME = 7
EVENT_SAMPLERATE = 8
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4
EE_OK = 0

ESPEAK_RATE_MIN, ESPEAK_RATE_MAX = 80, 450  # words per minute eSpeak accepts
RAND_SEED = 12345


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class ESpeakError(RuntimeError):
    pass


@dataclass(frozen=True)
class Phone:
    """One phoneme event: start sample (at the engine's rate), eSpeak mnemonic with stress marks, and
    the character offset of the word it belongs to."""

    sample: int
    name: str
    text_position: int


@dataclass(frozen=True)
class Word:
    sample: int
    text_position: int  # 1-based character offset, as eSpeak reports it
    length: int


@dataclass(frozen=True)
class Utterance:
    audio: np.ndarray  # int16 [N] at `sample_rate`
    sample_rate: int
    phones: list[Phone]
    words: list[Word]


def _private_library_copy() -> str:
    """A copy of libespeak-ng under a name nobody else loads (see ESpeak)."""
    import espeakng_loader

    src = Path(espeakng_loader.get_library_path())
    digest = hashlib.blake2b(src.read_bytes(), digest_size=8).hexdigest()
    folder = Path(tempfile.gettempdir()) / f"avatarforge-espeak-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(mode=0o700, exist_ok=True)
    dst = folder / f"libespeak-ng-{digest}{src.suffix}"
    if not dst.is_file():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(src.read_bytes())
        os.replace(tmp, dst)  # atomic: concurrent processes never load a half-written file
    return str(dst)


class ESpeak:
    """eSpeak NG, freshly loaded for every utterance.

    eSpeak keeps synthesis state in C statics (pitch flutter phase, echo buffer, resonators) that
    espeak_Terminate does not reset, so the same text gives slightly different audio depending on what
    was spoken before in the process; and espeak_Initialize seeds its noise generator from the clock.
    Loading the library, initialising, fixing the random seed, speaking, terminating and unloading
    (dlclose) per utterance makes every utterance a pure function of its arguments, which byte-identical
    datasets need. It costs about 10 ms. The library is loaded from a private copy so no other user of
    libespeak-ng in the process can keep it mapped (which would keep the statics alive);
    `check_determinism` verifies it. Use `engine()` rather than constructing one.
    """

    def __init__(self) -> None:
        import espeakng_loader

        self._path = _private_library_copy()
        self._data = espeakng_loader.get_data_path().encode()
        self._chunks: list[np.ndarray] = []
        self._phones: list[Phone] = []
        self._words: list[Word] = []
        self._callback = _SynthCallback(self._on_synth)  # kept referenced: eSpeak holds a raw pointer
        self._lock = threading.Lock()
        self.sample_rate = 0
        self.check_determinism()

    def _load(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(self._path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data, INITIALIZE_PHONEME_EVENTS | INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            self._unload(lib)
            raise ESpeakError(f"espeak_Initialize failed ({rate}) with data at {self._data.decode()}")
        self.sample_rate = int(rate)
        # espeak_Initialize seeds eSpeak's noise generator (breath, roughness) from time(NULL): fix it
        seed_fn = lib.espeak_ng_SetRandSeed
        seed_fn.argtypes, seed_fn.restype = [ctypes.c_long], None
        seed_fn(RAND_SEED)
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    @staticmethod
    def _unload(lib: ctypes.CDLL) -> None:
        import _ctypes

        handle = lib._handle
        del lib
        _ctypes.dlclose(handle)

    def _on_synth(self, wav, n: int, events) -> int:  # noqa: ANN001 - ctypes pointers
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == EVENT_PHONEME:
                name = bytes(ev.id.string).split(b"\0", 1)[0].decode("utf-8", "replace")
                self._phones.append(Phone(int(ev.sample), name, int(ev.text_position)))
            elif ev.type == EVENT_WORD:
                self._words.append(Word(int(ev.sample), int(ev.text_position), int(ev.length)))
            i += 1
        return 0  # 0: continue synthesis

    def synth(self, text: str, *, voice: str = "en-us", rate: int = 175, pitch: int = 50,
              pitch_range: int = 50) -> Utterance:
        """Synthesise `text` with eSpeak voice name `voice` (e.g. 'en-us+m3'); rate in words/minute,
        pitch and pitch_range in eSpeak's 0..100. A pure function of its arguments."""
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            self._chunks, self._phones, self._words = [], [], []
            lib = self._load()
            try:
                if lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
                    raise ESpeakError(f"unknown eSpeak voice {voice!r}")
                for param, value in ((PARAM_RATE, int(np.clip(rate, ESPEAK_RATE_MIN, ESPEAK_RATE_MAX))),
                                     (PARAM_PITCH, int(np.clip(pitch, 0, 100))),
                                     (PARAM_RANGE, int(np.clip(pitch_range, 0, 100))),
                                     (PARAM_VOLUME, 100)):
                    if lib.espeak_SetParameter(param, value, 0) != EE_OK:
                        raise ESpeakError(f"espeak_SetParameter({param}, {value}) failed")
                buf = ctypes.create_string_buffer(data, len(data))
                status = lib.espeak_Synth(buf, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
                if status != EE_OK:
                    raise ESpeakError(f"espeak_Synth failed with status {status} for {text[:60]!r}")
            finally:
                lib.espeak_Terminate()
                self._unload(lib)
            audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            out = Utterance(audio.astype(np.int16), self.sample_rate, list(self._phones), list(self._words))
            self._chunks, self._phones, self._words = [], [], []
        return out

    def check_determinism(self) -> None:
        """Speak a probe twice with another utterance between; raise if the audio differs."""
        probe = {"text": "Five quick boats.", "voice": "en-us+f2"}  # f2 breathes: uses the noise generator
        first = self.synth(**probe).audio
        self.synth("Something else entirely, to disturb the state.", voice="en+m3", rate=240)
        if not np.array_equal(first, self.synth(**probe).audio):
            raise ESpeakError(
                "libespeak-ng keeps state between utterances even after unloading (is another copy "
                "pinned in this process?); synthetic datasets would not be reproducible"
            )


_ENGINE_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _engine() -> ESpeak:
    return ESpeak()


def engine() -> ESpeak:
    """The process-wide engine (created, and its determinism checked, on first use)."""
    with _ENGINE_LOCK:
        return _engine()


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling by FFT (exact ratio, no aliasing); float64 in, float64 out.

    The signal is zero-padded before the transform so the implicit periodic extension does not leak
    the end of the clip into its start.
    """
    x = np.asarray(audio, dtype=np.float64)
    if src_rate == dst_rate or len(x) == 0:
        return x.copy()
    n_out = int(round(len(x) * dst_rate / src_rate))
    pad = int(0.05 * src_rate)
    padded = np.concatenate([x, np.zeros(pad)])
    n_pad_out = int(round(len(padded) * dst_rate / src_rate))
    spec = np.fft.rfft(padded)
    keep = n_pad_out // 2 + 1
    if keep <= len(spec):
        spec = spec[:keep].copy()
        if n_pad_out % 2 == 0:
            spec[-1] = spec[-1].real  # Nyquist bin of an even-length output must be real
    else:
        spec = np.concatenate([spec, np.zeros(keep - len(spec), dtype=spec.dtype)])
    y = np.fft.irfft(spec, n=n_pad_out) * (n_pad_out / len(padded))
    return y[:n_out]
