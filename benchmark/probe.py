"""Run one repository script unchanged, as `__main__`, and measure it (the instrument of benchmark/scale.py).

  python benchmark/probe.py --out m.json --stop-after 6 -- dmd.py --teacher T --batch-size 336 ...
  python benchmark/probe.py --out m.json -- eval.py latency --generator G --batch-size 64

The script runs as `python SCRIPT ARGS` would run it (same sys.argv, its folder first on sys.path); nothing in
it is edited. What the probe adds, from outside:
  - training scripts (dmd.py, add.py) advance their tqdm bar ('DMD' / 'ADD') once per update. The probe wraps
    tqdm's update: after each update it synchronises the GPU and stamps the time, so update i took
    stamp[i] - stamp[i - 1]. Update --flops-step runs inside torch.utils.flop_counter.FlopCounterMode (without
    its module tracker; that update's time is not used). After --stop-after updates the run is stopped
    (before the script's checkpoint and export, which are not what is measured).
  - samplers (sample.Generator, which sample.py and eval.py latency call) get the FLOPs of their first call at
    each batch size counted the same way.
  - peak memory: torch.cuda.max_memory_allocated() over the whole run on CUDA; on a CPU the process's peak RSS.
Writes --out (JSON): stamps, flops_per_update, flops_per_call {batch: FLOPs}, peak_bytes, device, exit.
"""
import argparse
import contextlib
import json
import os
import resource
import runpy
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class StopRun(BaseException):
    """Raised inside the script once enough updates are measured (a BaseException: the script's handlers of
    Exception do not catch it)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the measurements (JSON)")
    p.add_argument("--stop-after", type=int, default=0, help="stop the run after this many updates (0: never)")
    p.add_argument("--flops-step", type=int, default=2, help="count the FLOPs of this update (>= 2; 0: none)")
    p.add_argument("--bars", default="DMD,ADD", help="descriptions of the tqdm bars that count training updates")
    p.add_argument("--live-memory", action="store_true", help="also count every tensor storage the run creates "
                   "(LiveMemory's peak; slower)")
    p.add_argument("script", help="the repository script, e.g. dmd.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = p.parse_args(argv)
    if args.flops_step == 1:
        p.error("--flops-step must be 0 or >= 2 (the counter starts when the update before it ends)")
    return args


def synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_bytes():
    """torch.cuda.max_memory_allocated(), or on a CPU the peak resident set size of this process."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _GlobalOnly:
    """A stand-in for FlopCounterMode's module tracker: every FLOP is counted under 'Global' only. The real
    tracker's backward hooks break torch.autograd.grad on leaf tensors (add.py's R1 penalty)."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode (its per-op formulas: matmuls, convolutions, attention, forward
    and backward), without module tracking."""
    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _GlobalOnly()
    return fc


class LiveMemory(TorchDispatchMode):
    """A TorchDispatchMode that counts the bytes of every tensor storage an operation creates while it is active,
    for as long as the storage lives (a weak reference tells when it is freed): `now`, `peak` and, with
    watch_grads(params), the parameters' gradients apart (`grads`; `peak_without_grads` is the most the rest held at
    once). Works on real tensors and under FakeTensorMode (benchmark/plan.py). Storages that exist before it starts
    are not counted; ignore(tensors) keeps a view of them from being counted as new.
    Not MemTracker (torch.distributed._tools.mem_tracker): it installs a gradient hook on every parameter of every
    module it sees (frozen ones refuse it) and stops when a root module runs twice (the teacher in a DMD update)."""

    def __init__(self):
        super().__init__()
        self.seen, self.grad_storages = WeakIdKeyDictionary(), WeakIdKeyDictionary()
        self.now = self.peak = self.grads = self.peak_without_grads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.created(out)
        return out

    def ignore(self, tensors):
        for t in tensors:
            self.seen[t.untyped_storage()] = 0

    def created(self, out):
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self.seen:
                    n = st.nbytes()
                    self.seen[st] = n
                    self.now += n
                    weakref.finalize(st, self._freed, n)
                    self._stamp()

    def _freed(self, n):
        self.now -= n

    def _stamp(self):
        self.peak = max(self.peak, self.now)
        self.peak_without_grads = max(self.peak_without_grads, self.now - self.grads)

    def watch_grads(self, params):
        """Count the gradients of these parameters apart from the rest (a hook after each accumulation)."""
        def hook(p):
            st = p.grad.untyped_storage()
            if st in self.seen and st not in self.grad_storages:
                self.grad_storages[st] = True
                self.grads += self.seen[st]
                weakref.finalize(st, self._grad_freed, self.seen[st])
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(hook)

    def _grad_freed(self, n):
        self.grads -= n


def rss_now():
    """This process's resident set size now, in bytes (Linux: /proc/self/status)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def measure(script, argv, stop_after=0, flops_step=2, bars=("DMD", "ADD"), live_memory=False):
    """Run `python script *argv` in this process with the instruments above; -> the measurements (dict).
    live_memory: also count the bytes of every tensor storage the run creates (LiveMemory): 'live_peak_bytes' over
    the run, 'live_update_peaks' of each update (from the end of the one before; the first includes the setup).
    'rss_start_bytes': the resident set when the script starts (the libraries it needs imported)."""
    import diffusers  # noqa: F401 - imported before the resident-set baseline, as every script needs them
    import tqdm
    import transformers  # noqa: F401
    root = os.path.dirname(os.path.abspath(script))
    sys.path.insert(0, root)
    import sample  # the sampler every exported student is called through (sample.py, eval.py latency)
    rec = {"script": os.path.basename(script), "stamps": [], "flops_per_update": None, "flops_per_call": {},
           "stopped": False, "exit": 0, "error": ""}
    live = LiveMemory() if live_memory else None
    counter = []
    orig_update, orig_call = tqdm.tqdm.update, sample.Generator.__call__

    def update(bar, n=1):
        out = orig_update(bar, n)
        if getattr(bar, "desc", None) not in bars:
            return out
        synchronize()
        rec["stamps"].append(time.perf_counter())
        done = len(rec["stamps"])
        if live is not None:   # the peak of each update alone (the first includes loading and setup)
            rec["live_update_peaks"].append(live.peak)
            live.peak = live.now
        if counter:
            counter.pop().__exit__(None, None, None)
        if flops_step and done == flops_step - 1:
            counter.append(flop_counter())
            counter[0].__enter__()
            rec["flops_counter"] = counter[0]
        if stop_after and done >= stop_after:
            raise StopRun
        return out

    def call(g, z, *a, **k):
        if str(len(z)) in rec["flops_per_call"]:
            return orig_call(g, z, *a, **k)
        with flop_counter() as fc:
            out = orig_call(g, z, *a, **k)
        rec["flops_per_call"][str(len(z))] = fc.get_total_flops()
        return out

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    old_argv, tqdm.tqdm.update, sample.Generator.__call__ = sys.argv, update, call
    sys.argv = [script, *argv]
    rec["rss_start_bytes"], rec["live_update_peaks"] = rss_now(), []
    try:
        with live or contextlib.nullcontext():
            runpy.run_path(script, run_name="__main__")
    except StopRun:
        rec["stopped"] = True
    except SystemExit as e:
        rec["exit"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except torch.cuda.OutOfMemoryError as e:
        rec["exit"], rec["error"] = 1, "oom: " + str(e).splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001 - any failure of the measured command becomes its row's status
        rec["exit"], rec["error"] = 1, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        while counter:
            counter.pop().__exit__(None, None, None)
        sys.argv, tqdm.tqdm.update, sample.Generator.__call__ = old_argv, orig_update, orig_call
        sys.path.remove(root)
    fc = rec.pop("flops_counter", None)
    if fc is not None and len(rec["stamps"]) >= flops_step:
        rec["flops_per_update"] = fc.get_total_flops()
    rec["flops_step"] = flops_step
    rec["peak_bytes"] = peak_bytes()
    rec["live_peak_bytes"] = max([live.peak, *rec["live_update_peaks"]]) if live else None
    rec["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return rec


def main(argv=None):
    args = parse_args(argv)
    script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    rec = measure(args.script, script_args, args.stop_after, args.flops_step, tuple(args.bars.split(",")),
                  args.live_memory)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
