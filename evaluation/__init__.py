"""Evaluation beyond one validation pass: sweeps of a task over context lengths and
needle depths (``eval.csv``, a length × depth heatmap, the state-capacity curve), for one
model, several, or every finished point of a grid (:mod:`mixstack.evaluation.sweep`)."""
