"""Training the bundled model (facert/models/talk2face-synth) on synthetic faces, on a CPU.

`python -m facert.export.train.build_bundled` runs every step (about an hour on two cores);
vqgan.py, lm.py and classifier.py can also be run one by one. They train the runtime's own
model code (facert.export.lm, facert.export.vqgan) with the runtime's own templates.
"""
