"""Parity: prove a deployed artifact computes what the PyTorch model computes.

Split as Polygraphy splits its comparator, one concern a module (import from the module):

* :mod:`~cascadec.verify.compare`: the numbers (Polygraphy's element-wise errors), numpy only;
* :mod:`~cascadec.verify.gates`: the policy (tolerances per precision, task-level thresholds),
  free of torch so the recipe schema can read its defaults;
* :mod:`~cascadec.verify.parity`: the comparator that runs PyTorch and the backends on real samples;
* :mod:`~cascadec.verify.results`: typed results and their report form;
* :mod:`~cascadec.verify.diagnose`: float64 rerun and first-divergent-layer search for a failed gate;
* :mod:`~cascadec.verify.present`: the failure table and parity rows in words.
"""
