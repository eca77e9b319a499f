"""System prompt templates, one ``<task>.txt`` per SN1 task; ``generic.txt`` answers the rest.

They live at the top of the repository to be read and edited, and install as the package
``openai_miner.prompts`` (see setup.cfg) so that ``pip install .`` ships them too.
"""
