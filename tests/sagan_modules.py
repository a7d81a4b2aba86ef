"""The attention blocks users have today, written out plainly (heykeetae's `Self_Attn` and
BigGAN-PyTorch's `Attention`): the anchors that FusedSelfAttention must reproduce and whose state
dicts it must load."""
import torch
import torch.nn.functional as F
from torch import nn


class HeykeetaeSelfAttn(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        query = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)  # B x N x C/8
        key = self.key_conv(x).view(b, -1, h * w)  # B x C/8 x N
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # B x N x N
        value = self.value_conv(x).view(b, -1, h * w)  # B x C x N
        out = torch.bmm(value, attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x, attention


class BigGANSNConv2d(nn.Conv2d):
    """BigGAN-PyTorch's SNConv2d as its README and code document it (one singular vector, one
    power iteration): buffers u0 (1, out) and sv0 (1,) beside the raw weight. Every forward, train
    or eval, runs one power-iteration step from u0 on W = weight.view(out, -1):
    v = normalize(u0 W), u = normalize(v W^T), sigma = v W^T u^T (gradient through W only), and
    convolves with W / sigma. Only training forwards store u in u0 and sigma in sv0."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, eps=1e-12, num_itrs=1):
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)
        self.eps, self.num_itrs = eps, num_itrs
        self.register_buffer("u0", torch.randn(1, out_channels))
        self.register_buffer("sv0", torch.ones(1))

    def normalized_weight(self):
        w = self.weight.view(self.weight.shape[0], -1)
        with torch.no_grad():
            v = F.normalize(self.u0 @ w, dim=1, eps=self.eps)
            u = F.normalize(v @ w.t(), dim=1, eps=self.eps)
        sigma = (v @ w.t() @ u.t()).squeeze()
        if self.training:
            with torch.no_grad():
                self.u0.copy_(u)
                self.sv0.copy_(sigma.detach().reshape(1))
        return self.weight / sigma

    def forward(self, x):
        return F.conv2d(x, self.normalized_weight(), self.bias)


class BigGANAttention(nn.Module):
    """BigGAN-PyTorch's `Attention`: which_conv=BigGANSNConv2d is theirs as shipped; nn.Conv2d the
    same block without spectral norm."""

    def __init__(self, ch, which_conv=nn.Conv2d):
        super().__init__()
        self.ch = ch
        self.theta = which_conv(ch, ch // 8, 1, bias=False)
        self.phi = which_conv(ch, ch // 8, 1, bias=False)
        self.g = which_conv(ch, ch // 2, 1, bias=False)
        self.o = which_conv(ch // 2, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        n = x.shape[2] * x.shape[3]
        theta = self.theta(x).view(-1, self.ch // 8, n)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, self.ch // 8, n // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, self.ch // 2, n // 4)
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x
