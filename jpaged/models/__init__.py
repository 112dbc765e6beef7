"""Functional model definitions: params pytrees and pure forward functions."""
