#include "version.h"
#include <archive.h>
#include <libdevmapper.h>
#include <stdio.h>

const char *img_native_version(void)
{
    static char buf[160];
    char dm[64] = "?";
    if (!dm_get_library_version(dm, sizeof(dm)))
        snprintf(dm, sizeof(dm), "?");
    snprintf(buf, sizeof(buf), "img-native 1 (libdevmapper %s, %s)", dm, archive_version_string());
    return buf;
}
