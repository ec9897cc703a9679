"""Execution engines: the only package that imports ray, petsc4py or mpi4py. Thin wiring only."""
