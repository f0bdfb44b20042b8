"""Runtimes that misbehave, for the harness's crash and hang handling (loaded in its child
process by "tests.fake_runtimes:Class", as any runtime registered in runtimes.base.RUNTIMES)."""

import os
import time

from runtimes.llamacpp import LlamaCppRuntime


class CrashingRuntime(LlamaCppRuntime):
    """Aborts the process in the middle of a prompt, as a native crash (SIGABRT) would."""

    def prefill(self, parts, *, fresh=True):
        os.abort()


class HangingRuntime(LlamaCppRuntime):
    """Never answers."""

    def prefill(self, parts, *, fresh=True):
        time.sleep(3600)


class WrongModeRuntime(LlamaCppRuntime):
    """Lays an image out in one token mode and returns its embeddings in another (the 4x/16x
    mix-up the transformers-quant runtime once had): 4x as many rows as its layout says."""

    def image_embeddings(self, image):
        import numpy as np

        return [np.repeat(e, 4, axis=0) for e in super().image_embeddings(image)]


class NonFiniteRuntime(LlamaCppRuntime):
    """Right logits except one NaN and one inf per row after the prompt: NaN compares false with
    every tolerance, so only an explicit check fails it."""

    def extend(self, tokens):
        import numpy as np

        rows = np.array(super().extend(tokens), copy=True)
        rows[:, 0], rows[:, 1] = np.nan, np.inf
        return rows
