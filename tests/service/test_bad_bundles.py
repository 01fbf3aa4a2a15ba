"""Bad bundles stop `exitserve serve` with a message naming the problem; nothing loads a pickle."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_support import DAMAGE_KINDS, damage

REPO = Path(__file__).resolve().parents[2]

# "checksum mismatch" at start-up is covered in test_server_lifecycle.py; the rest here.
START_UP_KINDS = [k for k in DAMAGE_KINDS if k != "checksum mismatch"]


@pytest.mark.parametrize("kind", START_UP_KINDS)
def test_bad_bundle_fails_start_up_naming_the_problem(digits_bundle: Path, tmp_path: Path, kind: str) -> None:
    broken, expected = damage(digits_bundle, tmp_path / "bundle", kind)
    result = subprocess.run([sys.executable, "-m", "exitserve.service.cli", "serve", str(broken), "--port", "0"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr  # one clear line, not a stack


# Loading code must never unpickle: pickles run code. models/data.py holds the one exception, an
# unpickler for CIFAR-10 batches that refuses every global but numpy's (tests/models/test_data.py).
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bpickle\.Unpickler\b"), "pickle.Unpickler"),
    (re.compile(r"\b(joblib|dill|cloudpickle)\.load"), "third-party unpickling"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
]


def test_no_pickle_loading_anywhere() -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    sources = [name for name in listed if not name.startswith("tests/")]
    assert "models/bundle.py" in sources and "service/serving/repository.py" in sources
    offences = []
    for relative in sources:
        path = REPO / relative
        if not path.is_file():
            continue
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for pattern, what in UNSAFE:
                if pattern.search(line) and not (relative == "models/data.py" and "_NumpyOnlyUnpickler(pickle.Unpickler)" in line):
                    offences.append(f"{relative}:{number}: {what}: {line.strip()}")
            if "torch.load(" in line and "weights_only=True" not in line:
                offences.append(f"{relative}:{number}: torch.load without weights_only=True: {line.strip()}")
    assert not offences, "\n".join(offences)
