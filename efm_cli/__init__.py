"""efm: unpaired image-to-image translation with Electrostatic Field Matching.

Two folders of images are the two plates of a capacitor; a network learns the electrostatic field between
them, and translating an image means following its field line from one plate to the other. This package holds
the `efm` command line tool; importing it stays cheap (no torch) so that `efm --help` answers instantly.
"""

__version__ = "0.1.0"
