"""Embedded tasks: data and model builders that run offline on a CPU."""
