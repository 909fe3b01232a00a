"""A PyTorch twin of fnokern's generator and physics loss (README "The model, exactly").

Built from the same config fields as fnokern (depth, width, max_channels, modes, min_resolution,
N, block), it loads fnokern's safetensors weights by name with strict shapes, so that loss,
output and every gradient can be compared entry by entry, and the same training step can be
timed in PyTorch eager. Blocks: ptycho and layerscale (the presets' and the shootout's).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Spectral(nn.Module):
    """rfft2 (unnormalised), a complex [C_in, C_out] mix per kept mode, irfft2."""

    def __init__(self, c, h, modes):
        super().__init__()
        self.h = h
        self.pos = min(modes, (h + 1) // 2)
        self.neg = min(modes, h // 2)
        self.cols = min(modes, h // 2 + 1)
        rows = self.pos + self.neg
        self.weight = nn.Parameter(torch.zeros(c, c, rows, self.cols, dtype=torch.complex64))

    def forward(self, x):
        b, c, h, w = x.shape
        xh = torch.fft.rfft2(x)
        y = torch.zeros(b, self.weight.shape[1], h, w // 2 + 1, dtype=torch.complex64, device=x.device)
        m = self.cols
        top = torch.einsum("bixy,ioxy->boxy", xh[:, :, : self.pos, :m], self.weight[:, :, : self.pos])
        y[:, :, : self.pos, :m] = top
        if self.neg:
            y[:, :, h - self.neg :, :m] = torch.einsum("bixy,ioxy->boxy", xh[:, :, h - self.neg :, :m], self.weight[:, :, self.pos :])
        return torch.fft.irfft2(y, s=(h, w))


class Block(nn.Module):
    def __init__(self, c, h, modes, kind, gain):
        super().__init__()
        self.kind = kind
        self.spectral = Spectral(c, h, modes)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        if kind == "layerscale":
            self.scale = nn.Parameter(torch.full((c,), gain))
        elif kind != "ptycho":
            raise ValueError(f"block {kind}: the twin has ptycho and layerscale")

    def forward(self, x):
        br = F.gelu(self.spectral(x) + self.conv(x))
        if self.kind == "layerscale":
            br = self.scale.view(1, -1, 1, 1) * br
        return x + br


class Generator(nn.Module):
    def __init__(self, depth, width, max_channels, modes, n, min_resolution=4, block="ptycho", gain=1e-2):
        super().__init__()
        levels, r, c = [], n, width
        for i in range(depth):
            down = i + 1 < depth and r % 2 == 0 and r // 2 >= min_resolution
            nxt = None if i + 1 == depth else ("down" if down else "same")
            levels.append((r, c, nxt))
            if nxt == "down":
                r, c = r // 2, min(2 * c, max_channels)
        self.levels = levels
        self.lifter = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
        self.encoder = nn.ModuleList(Block(c, r, modes, block, gain) for r, c, _ in levels)
        self.down = nn.ModuleDict()
        for i, (r, c, nxt) in enumerate(levels[:-1]):
            c2 = levels[i + 1][1]
            self.down[str(i)] = nn.Conv2d(c, c2, 2, stride=2) if nxt == "down" else nn.Conv2d(c, c2, 3, padding=1)
        r, c, _ = levels[-1]
        self.bottleneck = Block(c, r, max(modes // 2, 1), block, gain)
        self.decoder = nn.ModuleDict()
        for j in range(depth - 2, -1, -1):
            (rj, cj, nxt), cdeep = levels[j], levels[j + 1][1]
            up = nn.ConvTranspose2d(cdeep, cj, 2, stride=2) if nxt == "down" else nn.Conv2d(cdeep, cj, 3, padding=1)
            self.decoder[str(j)] = nn.ModuleDict(
                {"up": up, "conv1": nn.Conv2d(2 * cj, cj, 3, padding=1), "conv2": nn.Conv2d(cj, cj, 3, padding=1)}
            )
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        h = self.lifter(x)
        skips = []
        for i, blk in enumerate(self.encoder):
            h = blk(h)
            if i + 1 < len(self.encoder):
                skips.append(h)
                h = self.down[str(i)](h)
        h = self.bottleneck(h)
        for j in range(len(self.encoder) - 2, -1, -1):
            d = self.decoder[str(j)]
            h = d["conv2"](F.gelu(d["conv1"](torch.cat([d["up"](h), skips[j]], dim=1))))
        return self.head(h)


def normalized_amplitude_mae(out, diffraction, probe, probe_scale=0.25):
    """mean|pred - obs| / (mean(obs) + 1e-8), pred = |fftshift(fft2(O probe_scale P))| / N."""
    o = torch.complex(out[:, 0:1], out[:, 1:2])
    z = o * (probe_scale * probe)
    n = out.shape[-1]
    amp = torch.fft.fftshift(torch.fft.fft2(z), dim=(-2, -1)).abs() / n
    return (amp - diffraction).abs().mean() / (diffraction.mean().detach() + 1e-8)


def load_file(path):
    """A safetensors file as {name: CPU tensor}: the `safetensors` package's reader where it is
    installed, else safetensors_min's (a GPU host without network may lack the package)."""
    try:
        from safetensors.torch import load_file as read
    except ImportError:
        from safetensors_min import load_file as read
    return read(path)


def save_file(arrays, path):
    """{name: numpy array} into a safetensors file (the package's writer, else the fallback's)."""
    try:
        from safetensors.numpy import save_file as write
    except ImportError:
        from safetensors_min import save_file as write
    write(arrays, path)


def load(model, path):
    """fnokern's safetensors weights into the twin, every name and shape checked."""
    model.load_state_dict(load_file(path), strict=True)
    return model
