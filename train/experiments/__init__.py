"""The paper's experiments on real offline data: one command each, several seeds, tables and figures.

  python -m train.prepare_data --output_dir data    # once: the CSV files these read (--mpnet: MPNet)
  python -m train.experiments protocol    # the paper's protocol: a rate (and p) per method chosen on a dev
                                          # split, 3 tasks, 300 and 1000 examples, MPNet, bootstrap intervals
  python -m train.experiments methods     # Table 3/4: vanilla, CT-F, CT-D, five prior methods, CT-D + R3F
  python -m train.experiments ablations   # Table 5: prune, random and lowest-Fisher child networks
  python -m train.experiments domain      # Table 2: trained on Rotten Tomatoes, tested on other domains
  python -m train.experiments probe       # Figure 2: linear probes of the fine-tuned encoders on other tasks
  python -m train.experiments overlap     # Figure 3: Jaccard overlap of the child networks of several tasks
  python -m train.experiments layers      # where CT-D's child network lies, layer by layer
  python -m train.experiments all         # all of the above, then RESULTS.md
  python -m train.experiments report      # RESULTS.md from whatever runs exist

Every fine-tuning run is one ``train/run_glue.py`` process with its own output
directory ``<root>/runs/<cell>/seed_<s>``; a finished run (its
``all_results.json`` exists) is not run again, and an interrupted one resumes
from its checkpoint. Seeds run in the outer loop, so a partial campaign has
the same seeds in every cell. Tables (Markdown + CSV) and figures (PNG) go to
``results/``; ``report`` assembles them into ``RESULTS.md``.

The package, by what each part does: ``cells.py`` (the setting, the cells and the
protocol's grid, as the trainer's validated argument dataclasses), ``launcher.py`` (the
trainer processes: skip, resume, ``--jobs``, failures, stopping; the protocol's stages),
``protocol.py`` (dev splits, the rate and p choices, paired bootstrap intervals), ``probe.py``
(the linear-probe evaluator),
``report.py`` (each paper table and figure by name, and RESULTS.md), ``__main__.py`` (the
command line).

The setting (sizes chosen for a 2-core CPU): the embedded MiniLM-L6, 1,000
Rotten Tomatoes training examples (the paper's low-resource size), 48 tokens,
3 epochs, batch 16 and 10% warmup (the paper's BERT settings), learning rate
1e-4 (the top of the paper's grid: at 5e-5 this small model was still far from
fitting after 2 epochs), evaluation on 1,000 held-out reviews. Each prior method runs at one point of the paper's grid.
"""
