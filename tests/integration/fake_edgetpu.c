/* A stand-in for libedgetpu.so.1 with the same TFLite external-delegate entry points, so the tests drive the
 * real runtime's load_delegate() without Coral hardware.
 *
 * FAKE_EDGETPU_MODE=absent (default): tflite_plugin_create_delegate returns NULL without reporting a message,
 *   which is what libedgetpu does when it opens no device at the selector.
 * FAKE_EDGETPU_MODE=present: returns a delegate whose Prepare claims no node, so every operator runs on the CPU.
 * FAKE_EDGETPU_LOG=FILE: appends the options it was given ("key=value" lines) to FILE.
 *
 * The struct layout is TfLiteDelegate's (tensorflow/lite/core/c/common.h): data_, Prepare, CopyFromBufferHandle,
 * CopyToBufferHandle, FreeBufferHandle, flags, opaque_delegate_builder.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct FakeDelegate {
    void *data_;
    int (*Prepare)(void *context, struct FakeDelegate *delegate);
    void *CopyFromBufferHandle;
    void *CopyToBufferHandle;
    void *FreeBufferHandle;
    int64_t flags;
    void *opaque_delegate_builder;
    char reserved[64];
} FakeDelegate;

static int prepare_nothing(void *context, FakeDelegate *delegate) {
    (void)context;
    (void)delegate;
    return 0; /* kTfLiteOk: no node is replaced */
}

void *tflite_plugin_create_delegate(char **keys, char **values, size_t n, void (*report_error)(const char *)) {
    (void)report_error;
    const char *log = getenv("FAKE_EDGETPU_LOG");
    if (log) {
        FILE *f = fopen(log, "a");
        if (f) {
            for (size_t i = 0; i < n; i++) fprintf(f, "%s=%s\n", keys[i], values[i]);
            fclose(f);
        }
    }
    const char *mode = getenv("FAKE_EDGETPU_MODE");
    if (!mode || strcmp(mode, "present") != 0) return NULL;
    FakeDelegate *d = calloc(1, sizeof(FakeDelegate));
    if (d) d->Prepare = prepare_nothing;
    return d;
}

void tflite_plugin_destroy_delegate(void *delegate) { free(delegate); }
