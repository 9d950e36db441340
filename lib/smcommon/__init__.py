"""smcommon: the shared library of the storage manager.

VHD images (``smcommon.vhd``), the SR/VDI engine (``smcommon.engine``), the SMAPI
wire layer, and one wrapper per outside tool. Plugins under ``plugins/`` hand a
driver to this library's entry point.
"""

__version__ = "0.1.0"
