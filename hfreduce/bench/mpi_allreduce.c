/* The Open MPI side of hfreduce/bench/compare-mpi.sh: MPI_Allreduce (f32 sum) of the same sizes
 * as hfreduce-bench, printing the same columns (size, count, time us, algbw, busbw, #wrong). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float value(int rank, long index) { return (float)((index * 7 + rank * 13) % 17) - 8.0f; }

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    long min = argc > 1 ? atol(argv[1]) : 1L << 20;
    long max = argc > 2 ? atol(argv[2]) : 256L << 20;
    int iters = argc > 3 ? atoi(argv[3]) : 5;
    if (rank == 0) printf("%12s %12s %10s %8s %8s %7s\n", "size", "count", "time(us)", "algbw", "busbw", "#wrong");
    for (long bytes = min; bytes <= max; bytes *= 2) {
        long count = bytes / 4;
        float *data = malloc(bytes), *out = malloc(bytes);
        for (long i = 0; i < count; i++) data[i] = value(rank, i);
        MPI_Allreduce(data, out, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        long wrong = 0;
        for (long i = 0; i < count; i++) {
            float expected = 0;
            for (int r = 0; r < n; r++) expected += value(r, i);
            if (out[i] != expected) wrong++;
        }
        MPI_Barrier(MPI_COMM_WORLD);
        double start = MPI_Wtime();
        for (int k = 0; k < iters; k++) MPI_Allreduce(data, out, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double seconds = (MPI_Wtime() - start) / iters;
        double algbw = bytes / seconds / 1e9;
        if (rank == 0)
            printf("%12ld %12ld %10.1f %8.3f %8.3f %7ld\n", bytes, count, seconds * 1e6, algbw,
                   algbw * 2.0 * (n - 1) / n, wrong);
        free(data);
        free(out);
    }
    MPI_Finalize();
    return 0;
}
