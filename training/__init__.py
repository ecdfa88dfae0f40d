"""Training: plain functions (losses, parameter groups, schedules, metrics, data) and a
thin Lightning adapter (``mixstack.training.lit``, which alone imports lightning).

``import mixstack.training`` stays light; import the submodules you need.
"""
