"""The patch run: probe, cached features, prompt-group selection, judging, eval/predict, bench and its reports.

The generic pieces it runs on (runtime, loop, budget, checkpoints, metrics) live in ``pathotune.core``.
"""
