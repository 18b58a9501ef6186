"""The paper's patching at inference: whole-axial-plane 160 x 146 x 32 windows overlapping by 50 % along z
(``cmb_synthesis.synthesis.inference.synthesize_volume`` on MONAI's ``SlidingWindowInferer``)."""

from __future__ import annotations

import torch

from cmb_synthesis.synthesis.inference import synthesize_volume


class RecordWindows(torch.nn.Module):
    """Identity on the image channel that records each window's shape and first z slice (the image encodes
    the slice index)."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth, self.windows = depth, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        for w in x:
            self.windows.append((tuple(w.shape[1:]), round(float(w[0, 0, 0, 0]) * self.depth)))
        return x[:, :1].clone()  # a new tensor, like a network: the inferer weights its output in place


def test_paper_windows_are_whole_planes_overlapping_by_half_in_z():
    depth = 112  # the phantom's slice count
    image = (torch.arange(depth, dtype=torch.float32) / depth).expand(1, 160, 146, depth).clone()
    g = RecordWindows(depth)
    out = synthesize_volume(g, image, torch.zeros_like(image), patch=(160, 146, 32), overlap=0.5, device="cpu")
    assert {shape for shape, _ in g.windows} == {(160, 146, 32)}  # the whole axial plane, 32 slices
    assert sorted(start for _, start in g.windows) == [0, 16, 32, 48, 64, 80]  # neighbours share 16 slices
    torch.testing.assert_close(out, image)  # overlapping windows blend back to the volume


def test_windows_cover_a_depth_off_the_grid():
    depth = 50  # not a multiple of the 8-slice step: the last window is shifted to end at the last slice
    image = (torch.arange(depth, dtype=torch.float32) / depth).expand(1, 40, 36, depth).clone()
    g = RecordWindows(depth)
    synthesize_volume(g, image, torch.zeros_like(image), patch=(40, 36, 16), overlap=0.5, device="cpu")
    starts = sorted(start for _, start in g.windows)
    assert starts[0] == 0 and starts[-1] + 16 == depth
    assert all(b - a <= 8 for a, b in zip(starts, starts[1:]))  # at least half of each window overlaps the next
