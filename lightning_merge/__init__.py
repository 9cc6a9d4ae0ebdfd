"""lightning_merge: merge pretraining checkpoints with weights found by Bayesian optimisation.

Implements and extends Liu et al., "Checkpoint Merging via Bayesian
Optimization in LLM Pretraining" (arXiv 2403.19390). The public API:

- :class:`lightning_merge.series.CheckpointSeries` (``from_sources``)
- :func:`lightning_merge.merge.merge_into` and :func:`lightning_merge.writer.write_merged`
"""

__version__ = "0.1.0"
