// Binary morphology in the slice plane (per z), as src/engine/cpu/morph.rs: dilation or erosion with
// the diamond |dy| + |dx| <= r (the 4-neighbour cross applied r times) or the (2r+1)^2
// square. Input non-zero = foreground, output 0/1. Outside the slice is background: a
// dilation window is clipped, an erosion window that leaves the slice erodes the voxel.
// Slices never touch each other.

typedef unsigned char u8;
typedef unsigned long long u64;

// shape: 0 = cross (diamond), 1 = square. dilate: 1 = dilation, 0 = erosion.
extern "C" __global__ void morph2d(const u8* __restrict__ in, int nz, int ny, int nx, int radius, int shape,
                                   int dilate, u8* __restrict__ out) {
    u64 n = (u64)nz * ny * nx;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        int x = (int)(i % nx);
        int y = (int)((i / nx) % ny);
        const u8* s = in + (i - (u64)y * nx - x);
        bool res;
        if (dilate) {
            bool hit = false;
            int y0 = max(y - radius, 0), y1 = min(y + radius, ny - 1);
            for (int yy = y0; yy <= y1 && !hit; ++yy) {
                int ry = shape == 0 ? radius - abs(yy - y) : radius;
                int x0 = max(x - ry, 0), x1 = min(x + ry, nx - 1);
                const u8* row = s + (u64)yy * nx;
                for (int xx = x0; xx <= x1; ++xx) {
                    if (row[xx] != 0) {
                        hit = true;
                        break;
                    }
                }
            }
            res = hit;
        } else {
            bool all = y >= radius && y + radius < ny && x >= radius && x + radius < nx;
            for (int dy = -radius; dy <= radius && all; ++dy) {
                int ry = shape == 0 ? radius - abs(dy) : radius;
                const u8* row = s + (u64)(y + dy) * nx;
                for (int xx = x - ry; xx <= x + ry; ++xx) {
                    if (row[xx] == 0) {
                        all = false;
                        break;
                    }
                }
            }
            res = all;
        }
        out[i] = res ? 1 : 0;
    }
}
