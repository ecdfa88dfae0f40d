"""Model directories: local ones (:mod:`mixstack.hub.modeldir`: export, strict loading,
model cards), the unit the Hub pushes and pulls (DESIGN §8)."""
