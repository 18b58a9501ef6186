"""Custom MONAI transforms of the CMB synthesis/detection project (imported as ``transforms``).

Like a MONAI bundle's ``scripts`` package, bundle configs reach these by ``_target_: transforms.<Name>``.
"""
