"""`python -m lightning_mia.attack ...` = `python attack.py ...` (the experiment's attack stage
runs it as its own process when its queries would re-launch the command line)."""

from lightning_mia.cli import attack_main

attack_main()
