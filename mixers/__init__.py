"""One file per mixer. The registry imports every module of this package on first use
(:func:`mixstack.dsl.registry.builtin_modules`), so a new mixer file registers itself."""
