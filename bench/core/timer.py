"""Interleaved medians of several callables: ours and its baselines timed alike, in one process.

One ``Timer`` per run, its backend chosen by the device:

* CPU: the callables run round-robin after a warm-up, each timed with ``time.perf_counter`` (or
  this thread's CPU time with ``clock="thread"``: on a shared, oversubscribed machine it leaves out
  the time spent descheduled; only meaningful with one torch thread); the median per callable.
* CUDA: each sample is ``inner`` back-to-back calls between two CUDA events (``inner`` chosen so a
  sample lasts about ``sample_ms``, so the launch gaps of short calls are amortised as in a real
  model), samples of all callables interleaved round-robin, the median per call reported. The
  number of samples adapts to ``case_ms`` (at least ``min_reps``, at most ``reps``). With
  ``flush_l2`` every sample is one call preceded by overwriting a buffer twice the L2 size, so
  weights are read from HBM (off by default: in a model the next layer evicts big weights anyway,
  while small ones stay cached).

Never compare absolute times across runs: only ratios measured by one ``Timer`` call.
"""
import math
import statistics
import time

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def interleaved_median_ms(fns, reps=15, warmup=3, clock=time.perf_counter):
    """Median ms of each callable, run round-robin so machine noise hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            times[i].append(clock() - t0)
    return [statistics.median(t) * 1e3 for t in times]


class Timer:
    """``timer(fns) -> [median ms of each]``; ``reps`` / ``warmup`` may be given per call."""

    def __init__(self, device="cpu", reps=10, min_reps=3, warmup=1, sample_ms=0.5, case_ms=400.0,
                 flush_l2=False, clock="wall"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reps, self.min_reps, self.warmup = max(1, reps), max(1, min(min_reps, reps)), warmup
        self.sample_ms, self.case_ms = sample_ms, case_ms
        self.clock = clock
        self.flush = None
        if flush_l2 and self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
            self.flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device=self.device)

    def __call__(self, fns, reps=None, warmup=None):
        reps = self.reps if reps is None else max(1, reps)
        warmup = self.warmup if warmup is None else warmup
        if not self.cuda:
            return interleaved_median_ms(fns, reps=reps, warmup=warmup, clock=CLOCKS[self.clock])
        return self._cuda_medians(fns, reps, warmup)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _estimate_ms(self, fn):
        """ms of one call (mean of a burst of 10 when one call is under a millisecond)."""
        Event = self.torch.cuda.Event
        start, end = Event(enable_timing=True), Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = start.elapsed_time(end)
        if one >= 1.0:
            return one
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        return max(start.elapsed_time(end) / 10, 1e-4)

    def _cuda_medians(self, fns, max_reps, warmup):
        for fn in fns:          # first calls: lazy init, caches, one-time structure validation
            for _ in range(warmup):
                fn()
        self.sync()
        est = [self._estimate_ms(fn) for fn in fns]   # also warms up further
        inner = [1 if self.flush is not None else max(1, min(1000, math.ceil(self.sample_ms / e)))
                 for e in est]
        per_round = sum(e * i for e, i in zip(est, inner))
        reps = int(max(self.min_reps, min(max_reps, self.case_ms / max(per_round, 1e-3))))
        events = [[] for _ in fns]
        Event = self.torch.cuda.Event
        for _ in range(reps):
            for i, fn in enumerate(fns):
                if self.flush is not None:
                    self.flush.zero_()
                start, end = Event(enable_timing=True), Event(enable_timing=True)
                start.record()
                for _ in range(inner[i]):
                    fn()
                end.record()
                events[i].append((start, end))
        self.sync()
        return [statistics.median(s.elapsed_time(e) / inner[i] for s, e in events[i])
                for i in range(len(fns))]
