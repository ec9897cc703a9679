"""Pure math core of the retrieval system: arrays in, arrays out.

No Ray, no PETSc/MPI, no file formats here (tests enforce it). faiss and torch are used as array
math libraries.
"""
