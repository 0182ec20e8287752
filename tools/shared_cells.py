# %%
# @title Shared helpers: imports, and which GPUs this torch build can run (the same in all five notebooks)
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

PROFILES = ("smoke", "cpu", "full")


def cuda_arch_usable(capability, arch_list) -> bool:
    """Can a card of compute `capability` (major, minor) run a torch build made for `arch_list`?

    Yes when the build holds kernels for exactly sm_XY, or for sm_XW of the same major with W ≤ Y (binary
    compatible within a major: sm_86 kernels run on an sm_89 L4), or PTX compute_AB with AB ≤ XY (compiled
    for the card when first used). Arch-specific builds such as sm_90a run on their own card only.
    """
    card = tuple(capability)
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        built = divmod(int(number), 10)  # "86" → (8, 6), "120" → (12, 0)
        if kind == "sm" and built[0] == card[0] and built[1] <= card[1]:
            return True
        if kind == "compute" and built <= card:
            return True
    return False


# %%
# @title Shared helpers: the device, and the run profile
def pick_device() -> torch.device:
    """cuda → mps → cpu. A CUDA card this torch build cannot run is reported, with the fix, and skipped."""
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        archs = torch.cuda.get_arch_list()
        if cuda_arch_usable(capability, archs):
            return torch.device("cuda")
        name, (major, minor) = torch.cuda.get_device_name(0), capability
        print(f"Skipping CUDA: {name} (sm_{major}{minor}) cannot run this torch build, which has kernels "
              f"for {', '.join(archs)}. Fix: on Kaggle choose a T4 or L4 accelerator (not the P100); "
              "elsewhere install a torch wheel built for this card (pytorch.org → previous versions). "
              "Running on the CPU instead.")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_profile(requested, device: torch.device) -> str:
    """The explicit parameter wins, then $DLCV_PROFILE, then `full` on a GPU and `cpu` otherwise."""
    default = "full" if device.type in ("cuda", "mps") else "cpu"
    profile = requested or os.environ.get("DLCV_PROFILE") or default
    if profile not in PROFILES:
        raise ValueError(f"Unknown run profile {profile!r} (from PROFILE or $DLCV_PROFILE); "
                         f"use one of {', '.join(PROFILES)}.")
    return profile


# %%
# @title Shared helpers: does the CPU have native bf16, and how fast is one training step
def cpu_native_bf16(cpuinfo_text=None, machine=None) -> bool:
    """Does this CPU compute bf16 natively (x86 AVX512-BF16 or AMX, ARM's BF16 extension)?

    Reads the Linux CPU flags (or `cpuinfo_text` when given, for tests), macOS's sysctl on Apple silicon;
    elsewhere (Windows) it answers False, and the notebook stays in fp32.
    """
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    flags = set(re.findall(r"[a-z0-9_]+", " ".join(
        line.split(":", 1)[1] for line in cpuinfo_text.splitlines()
        if line.split(":")[0].strip() in ("flags", "Features"))))
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    if cpuinfo_text == "" and (machine or platform.machine()) == "arm64" and platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return out.stdout.strip() == "1"
    return False


def time_train_step(model, batch, loss_fn, amp_dtype, rounds: int = 3) -> float:
    """Fastest of `rounds` timed training steps (forward, backward, SGD update) after one warm-up step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    best = float("inf")
    for i in range(rounds + 1):
        t = time.perf_counter()
        with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(batch))
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        if i > 0:
            best = min(best, time.perf_counter() - t)
    return best


# %%
# @title Shared helpers: precision (bf16 where the hardware has it and it pays off)
def choose_precision(device, build_model=None, batch=None, loss_fn=None, channels_last: bool = False,
                     native_bf16=None, min_gain: float = 1.15) -> dict:
    """How to train here: {name, amp_dtype, scaler, channels_last, reason}.

    CUDA: bf16 autocast on compute capability ≥ 8, else fp16 with a gradient scaler. MPS: fp32. CPU: bf16
    autocast when the CPU has native bf16 and one timed step of this notebook's model (`build_model()` on
    `batch`) is at least `min_gain` times faster than fp32; else fp32. $DLCV_PRECISION=fp32 forces fp32.
    """
    forced = os.environ.get("DLCV_PRECISION", "auto").lower()
    fp32 = dict(name="fp32", amp_dtype=None, scaler=False, channels_last=channels_last)
    if forced not in ("auto", "fp32"):
        raise ValueError(f"DLCV_PRECISION={forced!r}: use 'auto' or 'fp32'.")
    if forced == "fp32":
        return {**fp32, "reason": "forced by DLCV_PRECISION=fp32"}
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:
            return dict(name="bf16", amp_dtype=torch.bfloat16, scaler=False, channels_last=channels_last,
                        reason="CUDA with compute capability ≥ 8: native bf16")
        return dict(name="fp16", amp_dtype=torch.float16, scaler=True, channels_last=channels_last,
                    reason="CUDA before compute capability 8: fp16 with a gradient scaler")
    if device.type != "cpu":
        return {**fp32, "reason": f"{device.type}: fp32"}
    native = cpu_native_bf16() if native_bf16 is None else native_bf16
    if not native or build_model is None:
        return {**fp32, "reason": "CPU without native bf16" if not native else "CPU: no model to time"}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = batch.to(device).contiguous(memory_format=fmt) if batch.dim() == 4 else batch.to(device)
    times = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp32 again", None)):
        torch.manual_seed(0)
        model = build_model().to(device).to(memory_format=fmt)
        times[name] = time_train_step(model, x, loss_fn, dtype)
    gain = min(times["fp32"], times["fp32 again"]) / times["bf16"]
    if gain >= min_gain:
        return dict(name="bf16", amp_dtype=torch.bfloat16, scaler=False, channels_last=channels_last,
                    reason=f"CPU with native bf16: a training step {gain:.1f}× faster than fp32")
    return {**fp32, "reason": f"CPU with native bf16, but only {gain:.2f}× faster than fp32 here"}


# %%
# @title Shared helpers: seeds, threads, folders, the first line of output
def seed_everything(seed: int) -> None:
    """Same seed, same numbers (on CPU; GPU kernels may still differ in the last bits)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads() -> int:
    """torch's default CPU thread count, or $DLCV_THREADS when set (e.g. 1 on a machine shared by jobs)."""
    wanted = os.environ.get("DLCV_THREADS")
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"DLCV_THREADS={wanted!r}: give a positive whole number of threads.")
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


def run_folders() -> dict:
    """Folders and switches from the environment: results, download cache, data, weights, offline."""
    env = os.environ.get
    kaggle = Path("/kaggle/working")
    cache = env("DLCV_CACHE_DIR") or (kaggle if kaggle.is_dir() else Path.home() / ".cache" / "dlcv")
    return dict(results=Path(env("DLCV_RESULTS_DIR") or "results"), cache=Path(cache),
                data=env("DLCV_DATA_DIR") or None, weights=env("DLCV_WEIGHTS_DIR") or None,
                offline=env("DLCV_OFFLINE", "").lower() in ("1", "true", "yes"))


def describe_run(profile, device, precision, threads, data_source, data_origin, runtime) -> str:
    """The first line every notebook prints: what runs where, on what data, and for about how long."""
    where = device.type
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = f"cpu ({threads} threads)"
    line = (f"profile={profile} | device={where} | precision={precision['name']} ({precision['reason']})"
            f" | torch {torch.__version__} | data: {data_source} from {data_origin}"
            f" | expected runtime: {runtime}")
    print(line)
    if data_source == "synthetic":
        print("NOTE: synthetic stand-in data; the numbers below only show that the code runs.")
    return line


# %%
# @title Shared helpers: lessons checked by the run, and the results file
def accuracy_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on `n` independent items (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n, 1))


def record_lesson(lessons: dict, name: str, holds, evidence: str, unavailable=None) -> None:
    """Print a claim's verdict (✓ held, ✗ did not, – could not be tested) and keep it for the results file.

    `holds` is the run's own check; `evidence` gives the numbers and the noise level it was judged by.
    `unavailable` (a reason) records a claim this run could not test, e.g. for lack of weights.
    """
    if not evidence:
        raise ValueError(f"lesson {name!r}: give the evidence (the numbers and the noise level)")
    if unavailable:
        lessons[name] = {"holds": None, "evidence": evidence, "unavailable": unavailable}
        print(f"– {name}: not tested in this run ({unavailable}); {evidence}")
        return
    lessons[name] = {"holds": bool(holds), "evidence": evidence}
    print(f"{'✓' if holds else '✗'} {name}: {evidence}")


def jsonable(value, path: str = "metrics"):
    """Plain JSON types (numpy and torch scalars/arrays converted); a NaN or infinity is an error."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor | np.ndarray):
        return jsonable(value.tolist(), path)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}: a results file holds finite numbers only")
    return value


def save_results(results_dir, notebook, profile, device, precision, data_source, seconds, metrics,
                 lessons) -> Path:
    """Write `<results_dir>/<notebook>.json` atomically (a half-written file never appears)."""
    record = jsonable({"notebook": notebook, "profile": profile, "device": device.type,
                       "precision": precision["name"], "torch": torch.__version__,
                       "data_source": data_source, "seconds": round(float(seconds), 1),
                       "metrics": metrics, "lessons": lessons}, "results")
    path = Path(results_dir) / f"{notebook}.json"
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2, ensure_ascii=False).encode()))
    return path


# %%
# @title Shared helpers: data errors that say how to fix them, random samples
class DataNotFoundError(RuntimeError):
    """No copy of the data could be found or fetched; the message says what was tried and how to fix it."""


class DataLayoutError(RuntimeError):
    """The data is there but broken: a missing or empty folder, an unreadable file, a wrong layout."""


class DownloadError(RuntimeError):
    """A download failed or delivered a broken file; nothing was left in the cache."""


def data_error(dataset: str, tried, fixes) -> DataNotFoundError:
    """The error for data found nowhere: what was tried, then the fixes that apply to this dataset."""
    return DataNotFoundError(
        f"Could not find the {dataset} data. Tried:\n  - " + "\n  - ".join(tried)
        + "\nFix it in one of these ways:\n" + "".join(f"  {i}. {fix}\n" for i, fix in enumerate(fixes, 1))
        + "Or run PROFILE='smoke', which falls back to a small synthetic stand-in.")


def sample_indices(n: int, k: int, seed: int, labels=None) -> np.ndarray:
    """Sorted indices of a seeded random sample of `k` of `n` items — never the first k.

    With `labels`, the sample keeps the class proportions (largest remainders): a class-sorted folder
    still gives every class its share.
    """
    rng = np.random.default_rng(seed)
    k = min(int(k), n)
    if labels is None:
        return np.sort(rng.choice(n, size=k, replace=False))
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * k / n
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: k - quota.sum()]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picks))


# %%
# @title Shared helpers: files written atomically, downloads that are checked before they are kept
def atomic_write(path, write, check=None) -> Path:
    """`write(binary file)` into a temporary file beside `path`, `check(temporary path)`, then rename.

    Readers never see half a file, and a file that fails `check` never gets the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def download_file(url: str, dest, check=None, timeout: float = 60) -> Path:
    """`dest`, downloaded from `url` once: complete (Content-Length) and passing `check(path)`, or an error.

    A cached `dest` is checked again before it is trusted; a broken one is deleted and fetched anew.
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            if check is not None:
                check(dest)
            return dest
        except Exception as e:  # a file a crash, a full disk or an older version left behind
            print(f"{dest} is broken ({type(e).__name__}: {e}); downloading it again.")
            dest.unlink()

    def fetch(f):
        request = urllib.request.Request(url, headers={"User-Agent": "dlcv-course"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            expected, got = response.headers.get("Content-Length"), 0
            while block := response.read(1 << 20):
                f.write(block)
                got += len(block)
        if expected is not None and got != int(expected):
            raise DownloadError(f"{url}: received {got} of {expected} bytes (connection cut?)")

    try:
        return atomic_write(dest, fetch, check)
    except Exception as e:
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {e}") from e


# %%
# @title Shared helpers: exercise checks (a failed check stops the run and gives a hint)
class ExerciseError(AssertionError):
    """An exercise's check failed; the message names the exercise, what went wrong, and a hint."""


def expect(condition, exercise: str, failure: str, hint: str) -> None:
    """Raise ExerciseError("✗ <exercise>: <failure> Hint: <hint>") unless `condition` holds."""
    if not condition:
        raise ExerciseError(f"✗ {exercise}: {failure}\n  Hint: {hint}")


def passed(exercise: str, what: str) -> None:
    """Say which checks of an exercise passed."""
    print(f"✓ {exercise}: {what}")
