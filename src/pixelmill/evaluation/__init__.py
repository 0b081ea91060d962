"""Evaluation: metrics from predictions, plots, and the self-contained HTML run report.

- ``metrics``: ``compute_metrics``, ``classification_report_text``, ``write_evaluation``
- ``plots``: confusion matrix, ROC, precision-recall, training curves, misclassified grid
- ``multilabel``: per-label thresholds (``choose_thresholds``), metrics and plots (``write_multilabel_evaluation``)
- ``bootstrap``: seeded, vectorised 95% bootstrap intervals of test metrics (``ci95``)
- ``report``: ``write_report(run_dir)`` -> ``run_dir/report.html``
"""
