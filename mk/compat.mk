# Kafka versions: `make compat` runs the end-to-end tests (python -m tests.compat) against a KRaft broker of each
# version in KAFKA_VERSIONS, one pass/fail line per version. Each version's jars come from Maven Central into
# .cache/kafka/<version>/jars, once, like `make kafka-jars`: 3.x through kafka-runtime/kafka-3.x/pom.xml (Log4j 1,
# reload4j), 4.x through kafka-runtime/pom.xml (Log4j 2 at the version that Kafka release builds with).
# COMPAT_ARGS passes options, e.g. `make compat KAFKA_VERSIONS=3.7.2 COMPAT_ARGS=--fast` (the CI subset) or
# COMPAT_ARGS='-- -k replay' (pytest options after `--`).

KAFKA_VERSIONS ?= 3.7.2 3.9.2 4.4.0
COMPAT_ARGS ?=
KAFKA_CACHE := .cache/kafka

kafka_pom = $(if $(filter 3.%,$(1)),kafka-runtime/kafka-3.x/pom.xml,kafka-runtime/pom.xml)
# Kafka 4.0 and 4.1 build with Log4j 2.24.3, 4.2 and later with 2.25.x (KAFKA-20369, KAFKA-20791).
kafka_log4j = $(if $(filter 3.%,$(1)),,-Dlog4j.version=$(if $(filter 4.0.% 4.1.%,$(1)),2.24.3,2.25.5))

.PHONY: compat

$(KAFKA_CACHE)/%/jars/.complete: kafka-runtime/pom.xml kafka-runtime/kafka-3.x/pom.xml
	rm -rf $(@D)
	mvn -B -q -f $(call kafka_pom,$*) $(MVN_DEP_PLUGIN):copy-dependencies \
	    -Dkafka.version=$* $(call kafka_log4j,$*) -DoutputDirectory=$(CURDIR)/$(@D) -DincludeScope=runtime
	touch $@

compat: install $(foreach v,$(KAFKA_VERSIONS),$(KAFKA_CACHE)/$(v)/jars/.complete) ## end-to-end tests on each of KAFKA_VERSIONS (Kafka 3.7 to 4.x)
	$(PY) -m tests.compat $(KAFKA_VERSIONS) $(COMPAT_ARGS)
