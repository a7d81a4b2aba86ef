"""The attention blocks users have today, written out plainly from the public code of each repo
(heykeetae/Self-Attention-GAN sagan_models.py; ajbrock/BigGAN-PyTorch layers.py; POSTECH-CVLab/
PyTorch-StudioGAN src/utils/ops.py): the anchors that FusedSelfAttention and sagan_ext.fuse must
reproduce, with the same parameter names, call conventions and spectral norm arithmetic."""
import torch
import torch.nn.functional as F
from torch import nn


class HeykeetaeSelfAttn(nn.Module):
    """sagan_models.Self_Attn (heykeetae/Self-Attention-GAN, after its 2018-06-15 permute fix): the
    activation argument is stored and unused there too; returns (out, attention), always."""

    def __init__(self, in_dim, activation="relu"):
        super().__init__()
        self.chanel_in, self.activation = in_dim, activation  # their spelling
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        query = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)  # B x N x C/8
        key = self.key_conv(x).view(b, -1, h * w)  # B x C/8 x N
        attention = self.softmax(torch.bmm(query, key))  # B x N x N
        value = self.value_conv(x).view(b, -1, h * w)  # B x C x N
        out = torch.bmm(value, attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x, attention


def _gram_schmidt(x, ys):
    for y in ys:
        x = x - torch.mm(y, x.t()) * y / torch.mm(y, y.t())
    return x


def _biggan_power_iteration(w, us, update, eps):
    """layers.power_iteration: one step per singular vector (each u a (1, out) buffer), v and u
    orthogonalised against the earlier ones; the u buffers are overwritten only if `update`."""
    new_us, vs, svs = [], [], []
    for u_buffer in us:
        with torch.no_grad():
            v = F.normalize(_gram_schmidt(torch.matmul(u_buffer, w), vs), eps=eps)
            vs.append(v)
            u = F.normalize(_gram_schmidt(torch.matmul(v, w.t()), new_us), eps=eps)
            new_us.append(u)
            if update:
                u_buffer[:] = u
        svs.append(torch.squeeze(torch.matmul(torch.matmul(v, w.t()), u.t())))
    return svs


class BigGANSN:
    """layers.SN, BigGAN-PyTorch's spectral norm mixin: buffers u0.. (1, out) and sv0.. (1,) beside
    the raw weight; W_() runs num_itrs power-iteration steps from the stored u on every forward,
    train or eval, and divides by the first singular value (gradient through W only). Only training
    forwards store u and sv (sv for logging)."""

    def __init__(self, num_svs, num_itrs, num_outputs, transpose=False, eps=1e-12):
        self.num_itrs, self.num_svs, self.transpose, self.eps = num_itrs, num_svs, transpose, eps
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs))
            self.register_buffer(f"sv{i}", torch.ones(1))

    @property
    def u(self):
        return [getattr(self, f"u{i}") for i in range(self.num_svs)]

    @property
    def sv(self):
        return [getattr(self, f"sv{i}") for i in range(self.num_svs)]

    def W_(self):  # noqa: N802 (their name; sagan_ext.fuse looks for it)
        w = self.weight.view(self.weight.size(0), -1)
        if self.transpose:
            w = w.t()
        for _ in range(self.num_itrs):
            svs = _biggan_power_iteration(w, self.u, self.training, self.eps)
        if self.training:
            with torch.no_grad():
                for sv_buffer, sv in zip(self.sv, svs):
                    sv_buffer[:] = sv
        return self.weight / svs[0]


class BigGANSNConv2d(nn.Conv2d, BigGANSN):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 num_svs=1, num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        BigGANSN.__init__(self, num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.W_(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class BigGANSNLinear(nn.Linear, BigGANSN):
    def __init__(self, in_features, out_features, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Linear.__init__(self, in_features, out_features, bias)
        BigGANSN.__init__(self, num_svs, num_itrs, out_features, eps=eps)

    def forward(self, x):
        return F.linear(x, self.W_(), self.bias)


class BigGANSNEmbedding(nn.Embedding, BigGANSN):
    def __init__(self, num_embeddings, embedding_dim, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        BigGANSN.__init__(self, num_svs, num_itrs, num_embeddings, eps=eps)

    def forward(self, x):
        return F.embedding(x, self.W_())


class BigGANAttention(nn.Module):
    """layers.Attention of BigGAN-PyTorch: forward(x, y=None), y unused (its G calls every block as
    block(h, y)). Theirs defaults to which_conv=SNConv2d (BigGANSNConv2d here); this default,
    nn.Conv2d, is the same block without spectral norm (BigGAN's G_param != 'SN')."""

    def __init__(self, ch, which_conv=nn.Conv2d):
        super().__init__()
        self.ch = ch
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, y=None):
        n = x.shape[2] * x.shape[3]
        theta = self.theta(x).view(-1, self.ch // 8, n)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, self.ch // 8, n // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, self.ch // 2, n // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


class StudioGANSelfAttention(nn.Module):
    """src/utils/ops.py SelfAttention of POSTECH-CVLab/PyTorch-StudioGAN: conv1x1_theta/phi/g/attn
    made by MODULES.g_conv2d or d_conv2d (ops.snconv2d: torch's spectral_norm with eps=1e-6, or
    ops.conv2d), phi and g max-pooled by a MaxPool2d module, the gain `sigma` of shape (1,)."""

    def __init__(self, in_channels, is_generator, MODULES):  # noqa: N803 (their name)
        super().__init__()
        self.in_channels = in_channels
        conv = MODULES.g_conv2d if is_generator else MODULES.d_conv2d
        self.conv1x1_theta = conv(in_channels, in_channels // 8, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv1x1_phi = conv(in_channels, in_channels // 8, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv1x1_g = conv(in_channels, in_channels // 2, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv1x1_attn = conv(in_channels // 2, in_channels, kernel_size=1, stride=1, padding=0, bias=False)
        self.maxpool = nn.MaxPool2d(2, stride=2, padding=0)
        self.softmax = nn.Softmax(dim=-1)
        self.sigma = nn.Parameter(torch.zeros(1), requires_grad=True)

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.conv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.conv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = self.softmax(torch.bmm(theta.permute(0, 2, 1), phi))
        g = self.maxpool(self.conv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        return x + self.sigma * self.conv1x1_attn(attn_g)
