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


class BigGANAttention(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.ch = ch
        self.theta = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.phi = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.g = nn.Conv2d(ch, ch // 2, 1, bias=False)
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        n = x.shape[2] * x.shape[3]
        theta = self.theta(x).view(-1, self.ch // 8, n)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, self.ch // 8, n // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, self.ch // 2, n // 4)
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x
