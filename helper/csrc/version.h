/* Version of the native layer; bumped when the C ABI or extraction semantics change. */
#ifndef IMG_VERSION_H
#define IMG_VERSION_H
const char *img_native_version(void);
#endif
