"""What any training or inference run needs and that knows nothing of patches or slides.

Runtime and Fabric factory, the one inference loop, the training loop (``fit``), budgets, checkpoints, metrics and
their intervals, significance bounds, typed config building and the allocator setting. ``engine`` (patch runs),
``slides``, ``mil`` and ``serve`` build on it; core imports none of them.
"""
