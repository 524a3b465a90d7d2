"""Hydra plugin of reprolab: serves the cells of paper grids (`configs/cells/<grid>/`) as
`experiment/<row>_<col>` configs (`grid.py` says how; `plugins.py` wires it into Hydra)."""
