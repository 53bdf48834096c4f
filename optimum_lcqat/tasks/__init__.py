"""Offline lm-evaluation-harness tasks shipped with optimum-lcqat.

Use them with ``--include_path`` pointing at :data:`TASKS_DIR` (``optimum-lcqat lm-eval`` adds
it for you):

* ``lcqat_heldout_ppl``: rolling log-likelihood (word/byte perplexity, bits per byte) on the
  held-out Python tutorial, one document per file; ``--metadata '{"text_files": [...]}'``
  points it at your own local text files instead.
* ``lcqat_heldout_lastword``: last-word prediction accuracy (LAMBADA-style) on paragraphs of
  the same held-out text.
"""

from pathlib import Path

TASKS_DIR = str(Path(__file__).parent)
TASK_NAMES = ("lcqat_heldout_ppl", "lcqat_heldout_lastword")
