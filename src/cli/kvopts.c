/* qemu-style option lists ("key=value,key2=value2", ",," for a comma). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* Copy one field of s ending at an unescaped ',' (or '=' when stop_eq);
 * ",," becomes ','.  Returns the copy and sets *rest past the field. */
static char *take_field(const char *s, bool stop_eq, const char **rest)
{
    char *out = malloc(strlen(s) + 1);
    if (!out)
        return NULL;
    size_t n = 0;
    while (*s) {
        if (*s == ',' && s[1] == ',') {
            out[n++] = ',';
            s += 2;
        } else if (*s == ',' || (stop_eq && *s == '=')) {
            break;
        } else {
            out[n++] = *s++;
        }
    }
    out[n] = '\0';
    *rest = s;
    return out;
}

static int append(struct cli_kvlist *list, char *key, char *value)
{
    struct cli_kv *items =
        realloc(list->items, (list->n + 1) * sizeof(*list->items));
    if (!items) {
        free(key);
        free(value);
        return -ENOMEM;
    }
    list->items = items;
    list->items[list->n].key = key;
    list->items[list->n].value = value;
    list->n++;
    return 0;
}

int cli_kv_parse(struct cli_kvlist *list, const char *s)
{
    while (*s) {
        const char *p;
        char *key = take_field(s, true, &p);
        char *value = NULL;
        if (!key)
            return -ENOMEM;
        if (*p == '=') {
            value = take_field(p + 1, false, &p);
            if (!value) {
                free(key);
                return -ENOMEM;
            }
        }
        if (*key || value) {
            if (append(list, key, value) < 0)
                return -ENOMEM;
        } else {
            free(key);
        }
        s = *p == ',' ? p + 1 : p;
    }
    return 0;
}

int cli_kv_set(struct cli_kvlist *list, const char *key, const char *value)
{
    char *k = strdup(key);
    char *v = value ? strdup(value) : NULL;
    if (!k || (value && !v)) {
        free(k);
        free(v);
        return -ENOMEM;
    }
    return append(list, k, v);
}

const char *cli_kv_get(const struct cli_kvlist *list, const char *key)
{
    const char *v = NULL;
    for (size_t i = 0; i < list->n; i++)
        if (strcmp(list->items[i].key, key) == 0)
            v = list->items[i].value;
    return v;
}

bool cli_kv_has(const struct cli_kvlist *list, const char *key)
{
    for (size_t i = 0; i < list->n; i++)
        if (strcmp(list->items[i].key, key) == 0)
            return true;
    return false;
}

void cli_kv_free(struct cli_kvlist *list)
{
    for (size_t i = 0; i < list->n; i++) {
        free(list->items[i].key);
        free(list->items[i].value);
    }
    free(list->items);
    list->items = NULL;
    list->n = 0;
}

int cli_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"on", "yes", "true", "y"};
    static const char *const no[] = {"off", "no", "false", "n"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (strcmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}
