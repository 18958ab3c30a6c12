"""What `llm-inference` says on stderr while it runs: a progress bar of the requests done with the tokens generated
so far and their rate (refreshed about once a second, also within one long batch), notes, and one summary line at
the end. `--quiet` turns all of it off. The bar appears with the first generated token, so input errors found
before generation stay the only line on stderr; stdout and the responses JSON are never touched."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

REFRESH_S = 1.0


class Progress:
    """Counts requests and generated tokens; with `enabled=False` every method is a no-op."""

    def __init__(self, requests: int, enabled: bool = True):
        self.requests, self.enabled = requests, enabled
        self.tokens = 0
        self.start = self.last_refresh = time.perf_counter()
        self._bar: tqdm | None = None

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(total=self.requests, desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True,
                             disable=not self.enabled,
                             bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}")
        return self._bar

    def note(self, message: str) -> None:
        if self.enabled:
            tqdm.write(f"note: {message}", file=sys.stderr)

    def tokens_generated(self, n: int) -> None:
        """`n` more tokens sampled (one per active row per step)."""
        self.tokens += n
        if self.enabled and (self._bar is None or time.perf_counter() - self.last_refresh >= REFRESH_S):
            self._show_rate()

    def requests_done(self, n: int) -> None:
        if self.enabled:
            self.bar.update(n)

    def _show_rate(self) -> None:
        self.last_refresh = time.perf_counter()
        rate = self.tokens / max(self.last_refresh - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens} tokens, {rate:.1f} tokens/s")

    def close(self) -> None:
        """End the bar line (with the final count), also when the run stops on an error."""
        if self._bar is not None:
            if self.enabled:
                self._show_rate()
            self._bar.close()

    def summary(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}{'es' if what.endswith('ch') else 's'}"


def summary_line(requests: int, timing, seconds: float) -> str:
    """One line: requests, batches, tokens generated (each request's first token comes from its prefill, the rest
    from decode steps), wall time, and the prefill and decode rates of `runtime.generate.Timing`."""
    p = timing.profile()
    return (f"llm-inference: {_count(requests, 'request')} in {_count(len(timing.first_token_s), 'batch')}, "
            f"{_count(p['decode_tokens'] + requests, 'token')} generated in {seconds:.1f} s (prefill "
            f"{p['prefill_tokens_per_second']:.0f} tokens/s, decode {p['decode_tokens_per_second']:.1f} tokens/s)")
